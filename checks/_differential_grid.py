"""One tree's answers to the differential grid (run by test_no_regression_vs_4_3_0.py).

Run as ``PYTHONPATH=<exported tree> python _differential_grid.py MODELS_DIR EXPORT_DIR OUT``. It
loads every model saved under MODELS_DIR, in every dtype and in raw and compatibility mode, builds
four caches of the same tokens (normal, batchless, two ``names_filter`` caches), makes every call
of the grid with 4.3.0's arguments only, and saves to OUT, for each call, the outputs (tensors,
labels, dataclass fields) or the exception, and the warnings it emitted. Nothing here compares:
the parent process does, so that each tree runs alone in its own interpreter.
"""

import dataclasses
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("raw", "compat")  # in this order: compatibility mode is switched on after raw
# [batch, pos]; every id < the models' d_vocab (64). The targets are the next tokens.
TOKENS = torch.tensor([[5, 17, 33, 2, 60, 41], [9, 12, 3, 3, 50, 27]])
NEXT = torch.tensor([[17, 33, 2, 60, 41, 8], [12, 3, 3, 50, 27, 1]])
Call = Tuple[str, Callable[[], Any]]


def fmt(value: Any) -> str:
    """A repr that tells numpy integers from Python integers, for the call's key."""
    if isinstance(value, np.integer):
        return f"np.{type(value).__name__}({int(value)})"
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(item) for item in value) + "]"
    return repr(value)


def signature(name: str, **kwargs: Any) -> str:
    return f"{name}(" + ", ".join(f"{key}={fmt(value)}" for key, value in kwargs.items()) + ")"


def snapshot(value: Any) -> Any:
    """Everything a call returned, as tensors, labels and plain values (dataclasses by field)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: snapshot(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__class__": type(value).__name__, **fields}
    if isinstance(value, dict):
        return {str(key): snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return f"<{type(value).__name__}>"


def record(function: Callable[[], Any]) -> Dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result: Dict[str, Any] = {"value": snapshot(function())}
        except Exception as error:  # the verdict only asks whether pristine raised
            result = {"raised": f"{type(error).__name__}: {error}"}
    result["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return result


def randomize_unembed_bias(model: Any) -> None:
    """A non-zero ``b_U``, the same in every tree, so that one dropped or doubled would show."""
    b_U = getattr(model, "b_U", None)
    if isinstance(b_U, torch.Tensor):
        generator = torch.Generator().manual_seed(3)
        noise = torch.randn(b_U.shape, generator=generator)
        with torch.no_grad():
            b_U.copy_(noise.to(b_U.dtype))


def build_model(path: Path, dtype: torch.dtype) -> Any:
    """The raw bridge; the caller switches it to compatibility mode once raw is done."""
    from transformers import AutoModelForCausalLM

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
    architecture = hf.config.architectures[0]
    model = build_bridge_from_module(
        hf, architecture, hf_config=hf.config, dtype=dtype, device="cpu"
    )
    randomize_unembed_bias(model)
    return model


def build_caches(model: Any, n_layers: int) -> Dict[str, Any]:
    """A normal cache, a batchless one (has_batch_dim False), and two ``names_filter`` caches."""
    caches = {"normal": model.run_with_cache(TOKENS)[1]}
    caches["batchless"] = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)[1]
    caches["resid-only"] = model.run_with_cache(TOKENS, names_filter=lambda n: "hook_resid" in n)[1]
    dropped = f"blocks.{n_layers - 2}."  # one middle block's hooks missing
    caches["some-layers"] = model.run_with_cache(
        TOKENS, names_filter=lambda name: not name.startswith(dropped)
    )[1]
    return caches


def cache_calls(
    cache: Any, n_layers: int, d_model: int, full: bool, dtype: torch.dtype
) -> Iterator[Call]:
    """The ActivationCache methods, with 4.3.0's arguments only."""
    layers: List[Any] = [None, -1, 1, np.int64(1), n_layers, np.int64(n_layers)]
    positions: List[Any] = [None, -1, slice(1, 4)]
    if not full:  # the reduced grid of the batchless and names_filter caches
        layers, positions = [None, -1, np.int64(1), n_layers], [None, -1]
    bools = (False, True)
    batched = cache.has_batch_dim
    for layer in layers:
        for pos in positions:
            for apply_ln in bools:
                for incl_mid in bools:
                    for mlp_input in bools:
                        kw = dict(
                            layer=layer,
                            incl_mid=incl_mid,
                            apply_ln=apply_ln,
                            pos_slice=pos,
                            mlp_input=mlp_input,
                            return_labels=True,
                        )
                        yield signature("accumulated_resid", **kw), lambda kw=kw: (
                            cache.accumulated_resid(**kw)
                        )
                for mlp_input in bools:
                    for mode in ("all", "mlp", "attn") if full else ("all",):
                        kw = dict(
                            layer=layer,
                            mlp_input=mlp_input,
                            mode=mode,
                            apply_ln=apply_ln,
                            pos_slice=pos,
                            return_labels=True,
                        )
                        yield signature("decompose_resid", **kw), lambda kw=kw: (
                            cache.decompose_resid(**kw)
                        )
                for incl_remainder in bools:
                    kw = dict(
                        layer=layer,
                        return_labels=True,
                        incl_remainder=incl_remainder,
                        pos_slice=pos,
                        apply_ln=apply_ln,
                    )
                    yield signature("stack_head_results", **kw), lambda kw=kw: (
                        cache.stack_head_results(**kw)
                    )
            # The stack read at this position, normalized at every target with both statistics.
            for mlp_input in bools:
                for recompute_ln in bools:
                    kw = dict(
                        layer=layer,
                        mlp_input=mlp_input,
                        pos_slice=pos,
                        has_batch_dim=batched,
                        recompute_ln=recompute_ln,
                    )

                    def normalize(kw=kw, pos=pos):
                        stack = cache.accumulated_resid(incl_mid=True, pos_slice=pos)
                        return cache.apply_ln_to_stack(stack, **kw)

                    yield signature("apply_ln_to_stack", **kw), normalize
        # The per-neuron stacks are the expensive calls: last position, a slice of neurons.
        onto = torch.linspace(-1.0, 1.0, d_model, dtype=dtype)
        for apply_ln in bools:
            for mlp_input in bools:
                kw = dict(
                    layer=layer,
                    pos_slice=-1,
                    neuron_slice=slice(0, 8),
                    return_labels=True,
                    incl_remainder=mlp_input,
                    apply_ln=apply_ln,
                    mlp_input=mlp_input,
                )
                yield signature("stack_neuron_results", **kw), lambda kw=kw: (
                    cache.stack_neuron_results(**kw)
                )
                for expand_neurons in bools if full else (False,):
                    kw = dict(
                        layer=layer,
                        mlp_input=mlp_input,
                        expand_neurons=expand_neurons,
                        apply_ln=apply_ln,
                        pos_slice=-1,
                        return_labels=True,
                    )
                    yield signature("get_full_resid_decomposition", **kw), lambda kw=kw: (
                        cache.get_full_resid_decomposition(**kw)
                    )
            kw = dict(layer=layer, pos_slice=-1, apply_ln=apply_ln, project_output_onto=onto)
            yield signature("stack_neuron_results", **kw), lambda kw=kw: (
                cache.stack_neuron_results(**kw)
            )
            kw = dict(layer=layer, apply_ln=apply_ln, pos_slice=None, project_output_onto=onto)
            yield signature("get_full_resid_decomposition", **kw), lambda kw=kw: (
                cache.get_full_resid_decomposition(**kw)
            )
    yield "accumulated_resid()", lambda: cache.accumulated_resid()
    yield from logit_attrs_calls(cache)


def logit_attrs_calls(cache: Any) -> Iterator[Call]:
    """``logit_attrs`` of decompose_resid's stack, sliced as the tokens ask."""
    batched = cache.has_batch_dim
    next_tokens = NEXT if batched else NEXT[0]
    last = next_tokens[..., -1]
    # (name, the stack's pos_slice, its batch index, logit_attrs's arguments)
    cases: List[Tuple[str, Any, Any, Dict[str, Any]]] = [
        ("next tokens", None, None, dict(tokens=next_tokens)),
        ("next vs flipped", None, None, dict(tokens=next_tokens, incorrect_tokens=NEXT.flip(-1))),
        ("last position, 5", -1, None, dict(tokens=5, pos_slice=-1)),
        ("last position, 5 vs 9", -1, None, dict(tokens=5, incorrect_tokens=9, pos_slice=-1)),
    ]
    if batched:
        cases.append(("last tokens", -1, None, dict(tokens=last, pos_slice=-1)))
        cases.append(("batch 1", None, None, dict(tokens=next_tokens[1], batch_slice=1)))
    else:
        cases[1] = ("next vs flipped", None, None, dict(tokens=NEXT[0], incorrect_tokens=NEXT[1]))
    for name, pos, batch, kwargs in cases:
        for apply_ln_stack in (False, True):

            def attrs(pos=pos, batch=batch, kwargs=kwargs, apply_ln_stack=apply_ln_stack):
                stack = cache.decompose_resid(apply_ln=apply_ln_stack, pos_slice=pos)
                if batch is not None:
                    stack = stack[:, batch]
                return cache.logit_attrs(stack, has_batch_dim=batched, **kwargs)

            yield f"logit_attrs[{name}, decompose_resid(apply_ln={apply_ln_stack})]", attrs


def tool_calls(model: Any, cache: Any, cache_name: str) -> Iterator[Call]:
    """The logit-lens tool, ``cache.logit_lens`` and ``logit_readout``, with 4.3.0's arguments."""
    # The package re-exports the function under the module's name: import the module itself.
    module = importlib.import_module("transformer_lens.tools.analysis.logit_lens")
    batched = cache.has_batch_dim
    layer_sets: List[Any] = [None, [0, np.int64(2), -1]]
    options: List[Dict[str, Any]] = [
        dict(),
        dict(positions=None, incl_mid=True),
        dict(positions=slice(1, 4), apply_ln=False),
        dict(positions=None, targets=NEXT if batched else NEXT[0], chunk_size=5),
        dict(targets=[3, 17, 63], return_type="log_probs"),
        dict(top_k=4, return_type="probs", positions=None, chunk_size=7),
        dict(vocab=[0, 5, 63], return_type="probs", chunk_size=1, incl_mid=True),
    ]
    if batched:
        options.append(dict(batch_slice=1, positions=-1, top_k=3))
    for layers in layer_sets:
        for option in options:
            kw = dict(layers=layers, **option)
            yield signature("logit_lens(model, cache=cache", **kw), lambda kw=kw: (
                module.logit_lens(model, cache=cache, **kw)
            )
    yield "logit_lens(cache)", lambda: module.logit_lens(cache)
    if hasattr(cache, "logit_lens"):
        kw = dict(layers=[np.int64(1), -1], positions=None, incl_mid=True)
        yield signature("cache.logit_lens(", **kw), lambda kw=kw: cache.logit_lens(**kw)
    if cache_name == "normal":  # the tool runs the model itself, caching resid hooks only
        yield "logit_lens(model, TOKENS)", lambda: module.logit_lens(model, TOKENS)
        kw = dict(layers=[1, np.int64(-1)], positions=None, top_k=2)
        yield signature("logit_lens(model, TOKENS[:1]", **kw), lambda kw=kw: module.logit_lens(
            model, TOKENS[:1], **kw
        )
    vectors_key = "blocks.1.hook_resid_post"
    readouts: List[Dict[str, Any]] = [
        dict(),
        dict(apply_ln=False),
        dict(targets=NEXT if batched else NEXT[0], chunk_size=3),
        dict(vocab=[1, 2, 62], return_type="log_probs"),
        dict(top_k=5, chunk_size=7),
        dict(return_type="probs", chunk_size=1),
    ]
    for kw in readouts:

        def readout(kw=kw):
            return module.logit_readout(model, cache[vectors_key], **kw)

        yield signature(f"logit_readout(model, cache[{vectors_key!r}]", **kw), readout


def model_calls(model: Any, caches: Dict[str, Any]) -> Iterator[Call]:
    yield "forward logits", lambda: model(TOKENS)
    n_layers, d_model, dtype = model.cfg.n_layers, model.cfg.d_model, model.cfg.dtype
    for name, cache in caches.items():
        yield f"[{name}] cache keys", lambda cache=cache: sorted(cache.cache_dict)
        if name == "normal":  # the other caches hold subsets of the same forward pass
            yield f"[{name}] cache values", lambda cache=cache: dict(cache.cache_dict)
        full = name == "normal"
        for key, call in cache_calls(cache, n_layers, d_model, full, dtype):
            yield f"[{name}] {key}", call
        for key, call in tool_calls(model, cache, name):
            yield f"[{name}] {key}", call


def main(models_dir: Path, export_dir: Path, out: Path) -> None:
    import transformer_lens

    location = Path(transformer_lens.__file__).resolve()
    if export_dir.resolve() not in location.parents:
        raise SystemExit(f"transformer_lens came from {location}, not from {export_dir}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="transformers")
    results: Dict[str, Dict[str, Any]] = {}
    for path in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        for dtype_name, dtype in DTYPES.items():
            model = build_model(path, dtype)
            for mode in MODES:
                if mode == "compat":  # as a user would: the same bridge, switched
                    model.enable_compatibility_mode()
                prefix = f"{path.name}/{dtype_name}/{mode}"
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # gated-off hooks a names_filter names
                    caches = build_caches(model, model.cfg.n_layers)
                for key, call in model_calls(model, caches):
                    results[f"{prefix} {key}"] = record(call)
    torch.save(results, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
