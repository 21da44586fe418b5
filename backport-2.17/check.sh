#!/usr/bin/env bash
# Proves the frozen 2.x backport still applies: downloads the pinned TransformerLens 2.17.0 sdist,
# checks its sha256, unpacks it into a throwaway git repository and applies series/ with `git am`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=2.17.0
SHA256=93bfd6b6ac65e2b274edae430495663c8c8e99b53fd2c80ac428c4b0398e1272
CACHE=${BACKPORT_CACHE:-$HERE/../.cache/upstream}
SDIST=$CACHE/transformer_lens-$VERSION.tar.gz
PYTHON=${PYTHON:-python3}

if [ ! -f "$SDIST" ]; then
    mkdir -p "$CACHE"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        --dest "$CACHE" "transformer_lens==$VERSION"
fi
echo "$SHA256  $SDIST" | sha256sum --check --quiet

TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
tar -xzf "$SDIST" --strip-components=1 -C "$TREE"
git -C "$TREE" init --quiet
git -C "$TREE" -c user.name=backport -c user.email=backport@localhost add --all
git -C "$TREE" -c user.name=backport -c user.email=backport@localhost commit --quiet -m "v$VERSION"
git -C "$TREE" -c user.name=backport -c user.email=backport@localhost am --quiet "$HERE"/series/*.patch
echo "backport-2.17: $(ls "$HERE"/series/*.patch | wc -l) patches apply to transformer_lens $VERSION" \
    "($(git -C "$TREE" diff --shortstat HEAD~"$(ls "$HERE"/series/*.patch | wc -l)" HEAD))"
