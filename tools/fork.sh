#!/usr/bin/env bash
# Builds the fork: the pristine upstream release, then patches/, then the files this repository
# adds (as links, so editing them here needs no export step). Subcommands:
#   fetch          download the pinned sdist into .cache/upstream and check its sha256
#   fork           (re)create build/fork, refusing to discard edits that patches/ lacks
#   link           link files added to this repository since the fork was built
#   patches        regenerate patches/prN from build/fork (tools/series.py, tools/pull_requests.py)
#   patches-check  exit 1, naming the files, if build/fork edits upstream files beyond patches/
#   pristine DIR   unpack the pristine release into DIR as a git repository (for `make pr`)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=../upstream.env
. ./upstream.env

CACHE=.cache/upstream
SDIST="$CACHE/$UPSTREAM_NAME-$UPSTREAM_VERSION.tar.gz"
FORK=build/fork
PYTHON=${PYTHON:-.venv/bin/python}
# Upstream paths under which this repository keeps the files the pull request adds.
ADDED_ROOTS=(transformer_lens tests docs demos)

die() { echo "fork.sh: $*" >&2; exit 1; }
fgit() { git -C "$FORK" "$@"; }

fetch() {
    if [ ! -f "$SDIST" ]; then
        mkdir -p "$CACHE"
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$CACHE" \
            "$UPSTREAM_NAME==$UPSTREAM_VERSION" ||
            python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$CACHE" \
                "$UPSTREAM_NAME==$UPSTREAM_VERSION"
    fi
    echo "$UPSTREAM_SHA256  $SDIST" | sha256sum --check --quiet ||
        die "$SDIST does not match the pinned sha256 in upstream.env; delete it and retry"
}

# Unpack the pristine release into $1 as a git repository with one commit, tagged `upstream`.
pristine() {
    local dir=$1
    fetch
    rm -rf "$dir"
    mkdir -p "$dir"
    tar -xzf "$SDIST" --strip-components=1 -C "$dir"
    git -C "$dir" init --quiet --initial-branch=main
    git -C "$dir" config user.name "transformer-lens fork build"
    git -C "$dir" config user.email "fork-build@localhost"
    printf '%s\n' '__pycache__/' '*.egg-info/' '.pytest_cache/' '.mypy_cache/' '_build/' \
        >"$dir/.git/info/exclude"
    git -C "$dir" add --all
    git -C "$dir" commit --quiet \
        -m "Pristine $UPSTREAM_NAME $UPSTREAM_VERSION (sdist sha256 $UPSTREAM_SHA256)"
    git -C "$dir" tag upstream
}

upstream_files() { fgit ls-tree -r --name-only upstream; }

# The patches of every pull request, in the order they apply (the manifest's order of PRs).
series_patches() {
    local dir
    for dir in $(python3 tools/pull_requests.py patch-dirs); do
        ls "$dir"/*.patch 2>/dev/null || true
    done
}

# The tree that pristine + patches/ gives (up to and including PR $1, default all), written to the
# fork's object store.
expected_tree() {
    local index dir patch
    index=$(mktemp)
    GIT_INDEX_FILE=$index fgit read-tree upstream
    for dir in $(python3 tools/pull_requests.py patch-dirs); do
        for patch in $(ls "$dir"/*.patch 2>/dev/null || true); do
            GIT_INDEX_FILE=$index fgit apply --cached "$ROOT/$patch"
        done
        [ "$dir" != "patches/${1:-}" ] || break
    done
    GIT_INDEX_FILE=$index fgit write-tree
    rm -f "$index"
}

# Files that stacked PRs both edit, where tag pr/<name> (an earlier PR's version) differs from
# pristine + patches/ up to that PR.
unexported_stage_edits() {
    local name path tree
    python3 tools/pull_requests.py shared-edits | while read -r name path; do
        fgit rev-parse --verify --quiet "pr/$name" >/dev/null || { echo "$path (no tag pr/$name)"; continue; }
        tree=$(expected_tree "$name")
        fgit diff --quiet "$tree" "pr/$name" -- "$path" || echo "$path (at pr/$name)"
    done
}

# Files in build/fork whose content differs from pristine + patches/, or that nothing tracks.
unexported_edits() {
    local tree
    tree=$(expected_tree)
    upstream_files | (cd "$FORK" && xargs -d '\n' git diff --name-only "$tree" --)
    fgit ls-files --others --exclude-standard
}

patches_check() {
    [ -d "$FORK/.git" ] || { echo "no $FORK yet: nothing to check"; return 0; }
    local edits
    edits=$(unexported_edits; unexported_stage_edits)
    if [ -n "$edits" ]; then
        echo "build/fork holds edits that patches/ lacks:" >&2
        printf '%s\n' "$edits" | sed 's/^/  /' >&2
        echo "Commit them in build/fork and run 'make patches' (edits to upstream files; an" \
            "earlier PR's version of a file a later PR edits too is read at tag pr/<name>), or" \
            "move new files into this repository at their upstream path." >&2
        return 1
    fi
    echo "patches-check: build/fork matches pristine $UPSTREAM_VERSION + patches/"
}

patches() {
    [ -d "$FORK/.git" ] || die "no $FORK: run 'make fork' first"
    local dirty
    dirty=$(upstream_files | (cd "$FORK" && xargs -d '\n' git diff --name-only HEAD --))
    [ -z "$dirty" ] || die "uncommitted edits in build/fork, commit them first: $dirty"
    "$PYTHON" tools/series.py "$FORK" patches
}

# Link each added file from build/fork to this repository, at the shallowest missing directory.
link_added_files() {
    local file target
    git ls-files --cached --others --exclude-standard -- "${ADDED_ROOTS[@]}" | while read -r file; do
        target=$file
        while [ "$(dirname "$target")" != . ] && [ ! -e "$FORK/$(dirname "$target")" ]; do
            target=$(dirname "$target")
        done
        # Already visible, through a link made earlier (to the file or a folder above it).
        if [ "$(realpath -m "$FORK/$file")" = "$ROOT/$file" ]; then continue; fi
        [ ! -e "$FORK/$target" ] || die "$target exists upstream: change it with a patch instead"
        ln -sr "$ROOT/$target" "$FORK/$target"
    done
}

# Link files added to this repository since the fork was built (no rebuild, edits are kept).
link() {
    [ -d "$FORK/.git" ] || die "no $FORK: run 'make fork' first"
    link_added_files
    if [ -n "$(fgit status --porcelain -- "${ADDED_ROOTS[@]}" | grep '^??' || true)" ]; then
        fgit ls-files --others --exclude-standard -z -- "${ADDED_ROOTS[@]}" |
            xargs -0 -r git -C "$FORK" add --
        fgit commit --quiet -m "Link files newly added to the repository"
    fi
}

fork() {
    if [ -d "$FORK/.git" ] && ! patches_check >/dev/null; then
        patches_check || true
        die "refusing to rebuild $FORK: run 'make patches' first, or delete $FORK to discard"
    fi
    pristine "$FORK"
    local dir patch
    for dir in $(python3 tools/pull_requests.py patch-dirs); do
        for patch in $(ls "$dir"/*.patch 2>/dev/null || true); do
            fgit am --quiet --committer-date-is-author-date "$ROOT/$patch"
        done
        # Where stacked PRs edit the same file, tools/series.py reads the earlier PR's version here.
        fgit tag -f "pr/$(basename "$dir")" >/dev/null
    done
    link_added_files
    fgit add --all
    fgit commit --quiet --allow-empty -m "Add the pull request's new files (links into the repository)"
    "$PYTHON" -m pip install --quiet --constraint requirements/constraints.txt --no-build-isolation \
        --editable "$FORK"
    echo "build/fork: $UPSTREAM_NAME $UPSTREAM_VERSION + $(series_patches | wc -l)" \
        "patches + added files; installed editable into $(dirname "$(dirname "$PYTHON")")"
}

case "${1:-}" in
fetch) fetch ;;
fork) fork ;;
link) link ;;
patches) patches ;;
patches-check) patches_check ;;
pristine) pristine "${2:?usage: fork.sh pristine DIR}" ;;
*) die "usage: $0 fetch|fork|link|patches|patches-check|pristine DIR" ;;
esac
