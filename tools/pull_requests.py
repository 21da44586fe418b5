#!/usr/bin/env python3
"""The one manifest of the pull requests: which files and edits each carries, in which order.

Every other tool reads this file: `tools/series.py` (which PR's `patches/<name>/` an edit of an
upstream file is exported to), `tools/fork.sh` (the order the patches apply in), and
`tools/export_pr.py` (`make pr`, `make pr-check`: the commits of each series, its description,
the upstream tests it is checked against). Each PR is stacked on the ones before it.

A PR is a series of commits. A commit carries the edits of some upstream files (`edits`: the patch
of each is `patches/<pr>/`, written by `make patches`, with its message kept in the patch) and the
files this repository adds at upstream paths (`adds`), or both. A commit with `adds` and no
`edits` takes its message from here; one with `edits` only takes each patch's own message. Stacked
PRs may edit the same upstream file, each patch being the change from the PR before; which
version of the file each PR gets is said in tools/series.py.

Usage:
    tools/pull_requests.py patch-dirs       patches/<name> of every PR, in order (tools/fork.sh)
    tools/pull_requests.py upstream-tests   upstream's tests of the code the PRs touch (Makefile)
    tools/pull_requests.py shared-edits     `<pr> <file>` for each PR that edits a file a later PR
                                            edits too (tools/fork.sh patches-check)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Commit:
    """One commit of a series."""

    message: str = ""
    edits: tuple[str, ...] = ()
    adds: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullRequest:
    name: str
    title: str
    commits: tuple[Commit, ...]
    # Upstream's tests of the code the PR touches: `make pr-check` runs them on pristine 4.3.0 and
    # on pristine + the series up to this PR; none that passes on pristine may fail.
    upstream_tests: tuple[str, ...] = ()

    @property
    def description_template(self) -> str:
        return f"tools/{self.name}_description.md.in"

    @property
    def edits(self) -> tuple[str, ...]:
        return tuple(path for commit in self.commits for path in commit.edits)

    @property
    def adds(self) -> tuple[str, ...]:
        return tuple(path for commit in self.commits for path in commit.adds)


UPSTREAM_CACHE_AND_NORM_TESTS = (
    "tests/unit/test_activation_cache.py",
    "tests/unit/test_activation_cache_batch_dim.py",
    "tests/unit/model_bridge/test_mixed_norm_decomposition.py",
    "tests/unit/model_bridge/generalized_components/test_normalization_bridge.py",
    "tests/unit/model_bridge/generalized_components/test_normalization_hook_semantics.py",
    "tests/unit/model_bridge/generalized_components/test_layernorm_weight_offset.py",
)
UPSTREAM_LOGIT_LENS_TESTS = (
    "tests/unit/tools/test_logit_lens.py",
    "tests/integration/test_logit_lens.py",
)

PULL_REQUESTS = (
    PullRequest(
        "pr1",
        "Fresh normalization at every norm target, the norm's own arithmetic, no hooks (extends #1180)",
        (
            Commit(
                edits=("transformer_lens/model_bridge/generalized_components/normalization.py",)
            ),
            Commit(edits=("transformer_lens/ActivationCache.py",)),
            Commit(
                "Test recompute_ln: the norm's own forward, 4.3.0, and Hugging Face's norms\n\n"
                "Unit: at every target, recompute_ln=True equals the target norm's forward on\n"
                "each entry with torch.equal (LayerNorm from scratch and on processed weights,\n"
                "RMSNorm, Gemma's 1 + w, Gemma 4's norms wrapped as plain components;\n"
                "float32 and bfloat16; the stack walked in one step and in many); the default\n"
                "equals 4.3.0's loop and cached scale bit for bit; no hook fires and hooks left\n"
                "on the norm are named in a warning that says they do not run; the cache is\n"
                "untouched. Integration: Hugging Face's norm modules on Hugging Face's own\n"
                "pre-norm residuals at every target, on GPT-2, GPT-NeoX and Llama built from\n"
                "configs. Acceptance: the same on gpt2 and pythia-70m, each model and its\n"
                "Hugging Face reference loaded once per session (not slow: upstream's\n"
                "acceptance job runs it).",
                adds=(
                    "tests/unit/test_activation_cache_recompute_ln.py",
                    "tests/integration/test_recompute_ln_hf_ground_truth.py",
                    "tests/acceptance/test_recompute_ln_pretrained.py",
                ),
            ),
        ),
        UPSTREAM_CACHE_AND_NORM_TESTS + UPSTREAM_LOGIT_LENS_TESTS,
    ),
    PullRequest(
        "pr2",
        "Docs: the logit lens and direct logit attribution",
        (
            Commit(
                "Docs: the logit lens and direct logit attribution, side by side\n\n"
                "Which question each normalization answers, why the cached scale acts as a\n"
                "softmax temperature on early layers, and recipes on TransformerBridge that the\n"
                "test suite runs with their output checked, on a toy model whose weights come\n"
                "from a seeded torch.Generator, not from Hugging Face's initializers.",
                edits=("docs/source/index.md",),
                adds=(
                    "docs/source/content/logit_lens.md",
                    "tests/unit/test_logit_lens_docs_page.py",
                ),
            ),
        ),
        # No library code: upstream's tests cannot change; its docs build is `make docs`.
    ),
    PullRequest(
        "pr3",
        "Logit lens: KL to the model's output and target probabilities",
        (
            Commit(edits=("transformer_lens/tools/analysis/logit_lens.py",)),
            Commit(edits=("docs/source/content/analysis_tools.md",)),
            Commit(
                "Test kl_to_final and target_probs against the tool's own log-probs\n\n"
                "KL matches a naive KL from the tool's full-vocabulary log-probs at every\n"
                "stack shape the tool accepts (batched, int batch_slice, batchless cache,\n"
                "positions -1 / None / slice, incl_mid, layers without the final entry,\n"
                "apply_ln=False, a lens, chunks smaller than the entries), with per-row\n"
                "targets with and without an entry axis, in float32, bfloat16 and float16\n"
                "(a 50,257-token vocabulary under slow); 0 at the final entry; gradients\n"
                "through a lens; bad options fail before the forward pass; no matmul takes\n"
                "more than chunk_size rows; no hook fires, and a hook on ln_final is named.",
                adds=("tests/unit/tools/test_logit_lens_statistics.py",),
            ),
        ),
        UPSTREAM_LOGIT_LENS_TESTS,
    ),
)


def pull_requests_editing(path: str) -> list[PullRequest]:
    """The PRs whose series edit upstream file `path`, in stacking order."""
    owners = [pr for pr in PULL_REQUESTS if path in pr.edits]
    if not owners or any(pr.edits.count(path) > 1 for pr in owners):
        raise SystemExit(
            f"{path} is edited in build/fork, and tools/pull_requests.py lists it "
            f"{'in no pull request' if not owners else 'twice in one pull request'}: list each "
            "edited upstream file in the `edits` of one commit of each PR that changes it."
        )
    return owners


if __name__ == "__main__":
    if sys.argv[1:] == ["patch-dirs"]:
        print("\n".join(f"patches/{pr.name}" for pr in PULL_REQUESTS))
    elif sys.argv[1:] == ["shared-edits"]:
        for pr in PULL_REQUESTS:
            for path in pr.edits:
                if pull_requests_editing(path)[-1] is not pr:
                    print(pr.name, path)
    elif sys.argv[1:] == ["upstream-tests"]:
        print("\n".join(sorted({path for pr in PULL_REQUESTS for path in pr.upstream_tests})))
    else:
        raise SystemExit(__doc__)
