"""Repository-only checks: they import the shipped reference model from the repository root."""

import importlib.util
import sys
import tarfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# A script run by hand where CUDA is (no tests; importing it would run it).
collect_ignore = ["gpu_lens_on_cuda.py"]


def pristine_module(upstream_path: str, directory: Path) -> ModuleType:
    """Pristine 4.3.0's `upstream_path` (e.g. "transformer_lens/ActivationCache.py"), read from the
    pinned release sdist and imported by path, beside the fork."""
    env = dict(
        line.split("=", 1)
        for line in (ROOT / "upstream.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    name, version = env["UPSTREAM_NAME"].strip('"'), env["UPSTREAM_VERSION"].strip('"')
    sdist = ROOT / ".cache" / "upstream" / f"{name}-{version}.tar.gz"
    assert sdist.exists(), f"{sdist} is missing: `make setup` downloads it"
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(upstream_path))
        source = archive.extractfile(member)
        assert source is not None
        module_name = Path(upstream_path).stem + "_430"
        path = directory / f"{module_name}.py"
        path.write_bytes(source.read())
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
