#!/usr/bin/env bash
# Download the Python 3.12 / manylinux x86_64 wheels that the GPU machines lack.
#
#   .whl/     pcpp's own stack (diffusers 0.42.1 and what its image lacks), installed there with
#             pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   .whl-df/  the DistriFusion baseline stack (distrifuser 0.0.1b1 pins diffusers 0.24.0), installed
#             into its OWN target (/tmp/site-df) so it never meets diffusers 0.42.1.
#
# Both folders are git-ignored (/.whl*/ in .gitignore) and travel to the GPU machine through `carry`.
# The GPU image already has torch 2.11, numpy, safetensors, Pillow, regex, requests, filelock, fsspec,
# packaging, pyyaml, tqdm, typing-extensions, zipp, transformers 5.x and huggingface_hub 1.x
# (see /work/.library/device/KINDS.md and shared/research/gpu-facts.md); those are not fetched, so
# nothing here shadows a package the image's other libraries were built against.
#
# Rules kept: a folder holds one version of each package (two versions stop `pip install` there), and
# .whl/ may also receive wheels from colleagues, so this script only ADDS: a package already present in
# any version is left alone (and a differing version is reported). Run from anywhere; idempotent.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${PYTHON:-python3}"

# Wheels pcpp needs next to the GPU image's packages.
#  - diffusers: same version as the development machines; its Requires-Dist beyond the image is
#    importlib_metadata (which, at 10.x, needs lazy-importer and zipp>=3.20; zipp is pure and tiny,
#    bringing it avoids depending on the image's zipp version).
#  - einops, hypothesis: gpu-facts.md measured them absent on 2026-11-26.
pcpp_wheels=(
    "diffusers==0.42.1"
    "importlib_metadata==10.2.0"
    "lazy-importer==0.1.0"
    "zipp==4.1.2"
    "einops==0.8.2"
    "hypothesis==6.155.2"
)

# The DistriFusion stack that gpu-facts.md found to run beside torch 2.11: diffusers 0.24.0 imports
# huggingface_hub.cached_download (gone in 0.26), transformers 5 wants huggingface_hub 1.x, hence 4.44.2
# with tokenizers 0.19.1 (a compiled cp312 wheel).
df_wheels=(
    "distrifuser==0.0.1b1"
    "diffusers==0.24.0"
    "huggingface_hub==0.25.2"
    "transformers==4.44.2"
    "tokenizers==0.19.1"
    "importlib_metadata==10.2.0"
    "lazy-importer==0.1.0"
    "zipp==4.1.2"
)

# PEP 503-style normalisation, applied to both requirement names and wheel file names.
normalize() {
    echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'
}

# Prints the file name of a wheel of package $2 already in folder $1, if any.
existing_wheel() {
    local dir="$1" want="$2" f base
    for f in "$dir"/*.whl; do
        [[ -e "$f" ]] || continue
        base="$(basename "$f")"
        if [[ "$(normalize "${base%%-*}")" == "$want" ]]; then
            echo "$base"
            return 0
        fi
    done
    return 1
}

fetch_into() {
    local dir="$1"
    shift
    mkdir -p "$dir"
    local spec name version have
    for spec in "$@"; do
        name="${spec%%==*}"
        version="${spec#*==}"
        if have="$(existing_wheel "$dir" "$(normalize "$name")")"; then
            if [[ "$have" != *"-${version}-"* ]]; then
                echo "NOTE: $dir already holds $have; keeping it instead of $spec (one version per package)" >&2
            else
                echo "have  $have"
            fi
            continue
        fi
        echo "fetch $spec -> $dir"
        # Exact-N manylinux tags: pip matches each --platform literally, so list the usual ones.
        "$python_bin" -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 \
            -d "$dir" "$spec"
    done
}

fetch_into "$repo_root/.whl" "${pcpp_wheels[@]}"
fetch_into "$repo_root/.whl-df" "${df_wheels[@]}"

echo "--- sizes (both must stay well under 60 MB together; a device call carries at most 64 MiB)"
du -sh "$repo_root/.whl" "$repo_root/.whl-df"
du -sch "$repo_root/.whl" "$repo_root/.whl-df" | tail -n 1
