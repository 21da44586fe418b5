#!/usr/bin/env python3
"""Reads upstream's uv.lock: the versions `uv sync` installs on this interpreter and platform.

Subcommands:
    constraints LOCK    print a pip constraints file: `name==version` for every package uv sync
                        reaches from transformer-lens (its dependencies and the default dependency
                        groups), but torch and the CUDA packages only torch's own wheel needs
                        (the venv's torch is chosen by mk/lock.mk)
    requirements LOCK   print the requirement names to install: the dev and tokenizers groups
                        (pytest and its plugins, the checkers, what tests import); the library's
                        own dependencies come with the editable install of the tree
    torch LOCK          print the lock's torch version
    show LOCK NAME...   print `name==version` for the named packages (for the log)

The lock is walked as uv resolves it: from the root package, each dependency edge whose marker
holds here (python_full_version, sys_platform, ..., no extra requested), to the version the edge
names when the lock has several of that package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.markers import Marker, default_environment

ROOT_PACKAGE = "transformer-lens"
# uv's default groups in the pinned pyproject.toml: dev, docs, jupyter, multimodal, tokenizers.
DEFAULT_GROUPS = ("dev", "docs", "jupyter", "multimodal", "tokenizers")
INSTALLED_GROUPS = ("dev", "tokenizers")
# The lock's torch is a CUDA build; these come with it alone (and torchvision must match torch).
TORCH_FAMILY = ("torch", "torchvision", "triton", "setuptools")
TORCH_PREFIXES = ("nvidia-", "cuda-")


def load(lock: str) -> dict[tuple[str, str], dict]:
    packages = tomllib.loads(Path(lock).read_text())["package"]
    return {(package["name"], package["version"]): package for package in packages}


def holds(edge: dict) -> bool:
    """Whether a dependency edge applies here, with no extra of transformer-lens requested."""
    if "marker" not in edge:
        return True
    return Marker(edge["marker"]).evaluate({**default_environment(), "extra": ""})


def target(packages: dict[tuple[str, str], dict], edge: dict) -> dict:
    versions = [key for key in packages if key[0] == edge["name"]]
    if "version" in edge:
        return packages[(edge["name"], edge["version"])]
    if len(versions) != 1:
        raise SystemExit(f"uv.lock: {edge['name']} has versions {versions} and the edge names none")
    return packages[versions[0]]


def walk(lock: str, groups: tuple[str, ...]) -> dict[str, str]:
    """name -> version of every package uv sync installs here with these groups."""
    packages = load(lock)
    (root,) = [package for (name, _), package in packages.items() if name == ROOT_PACKAGE]
    edges = [*root.get("dependencies", [])]
    for group in groups:
        edges += root.get("dev-dependencies", {}).get(group, [])
    reached: dict[str, str] = {}
    expanded: set[tuple[str, str]] = set()
    while edges:
        edge = edges.pop()
        if not holds(edge):
            continue
        package = target(packages, edge)
        name = package["name"]
        if reached.setdefault(name, package["version"]) != package["version"]:
            raise SystemExit(f"uv.lock: {name} reached at {reached[name]} and {package['version']}")
        # A package is expanded once, and once more for each extra an edge asks of it.
        for part in ("", *edge.get("extra", [])):
            if (name, part) in expanded:
                continue
            expanded.add((name, part))
            if part:
                edges += package.get("optional-dependencies", {}).get(part, [])
            else:
                edges += package.get("dependencies", [])
    reached.pop(ROOT_PACKAGE, None)
    return reached


def is_torch_family(name: str) -> bool:
    return name in TORCH_FAMILY or name.startswith(TORCH_PREFIXES)


def main(argv: list[str]) -> int:
    command, lock, *names = argv
    if command == "constraints":
        pins = walk(lock, DEFAULT_GROUPS)
        print(
            f"# From {lock} by tools/lock_env.py: uv sync's versions here, torch's family left out."
        )
        for name, version in sorted(pins.items()):
            if not is_torch_family(name):
                print(f"{name}=={version}")
    elif command == "requirements":
        root = [package for (name, _), package in load(lock).items() if name == ROOT_PACKAGE][0]
        for group in INSTALLED_GROUPS:
            for edge in root["dev-dependencies"][group]:
                if holds(edge):
                    print(edge["name"])
    elif command == "torch":
        print(walk(lock, ())["torch"])
    elif command == "show":
        pins = walk(lock, DEFAULT_GROUPS)
        print(" ".join(f"{name}=={pins[name]}" for name in names if name in pins))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
