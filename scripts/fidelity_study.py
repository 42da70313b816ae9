"""Fidelity study of PCPP: how close patch-parallel images are to the single-device images, per setting.

The command of ``docs/fidelity.md``; the code is the package ``scripts/fidelity`` (its docstring says what each
module does). ``python scripts/fidelity_study.py --help`` lists the options.

Examples::

    # the small CPU plan: pcpp's tiny model, 22 configurations, ~28 min on 2 CPU cores (docs/fidelity.md)
    python scripts/fidelity_study.py --json docs/fidelity_results.json --table docs/fidelity.md \\
        --img-dir docs/img

    # any other set of configurations: RANKSxSIZES:MODES (modes exact, full, pX, with @wN for the warmup)
    python scripts/fidelity_study.py --run 2,4x32:exact,p0.3,full@w2 --prompts 16

    # a real pipeline on GPUs (untested: no weights or GPU were available when this was written)
    python scripts/fidelity_study.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda \\
        --captions prompts.txt --run 2,4x1024:exact,p0.3,full --steps 50 --batch-size 8
"""

from __future__ import annotations

# Run as a script, this file's folder (scripts/) is sys.path[0], so the package beside it imports; the spawned
# ranks inherit that path and import their worker functions from it by name.
from fidelity.main import main

if __name__ == "__main__":
    raise SystemExit(main())
