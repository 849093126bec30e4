"""Forward kernels under a few launch settings, for tuning
``akl_kernels/backends/triton/launch.py`` (whose chooser is patched here, not in the library).

    python -m benchmarks.launch_sweep --out DIR      (CUDA only; N = 16384, V = 128256, bf16)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

import akl_kernels
from akl_kernels.backends.triton import launch
from benchmarks.common import cuda_median_ms, device_meta, make_inputs

FORWARD_SWEEP = {  # loss -> launch overrides tried
    "fkl": [dict(), dict(BLOCK=2048, num_warps=8), dict(BLOCK=1024, num_warps=8),
            dict(BLOCK=4096, num_warps=16)],
    "akl": [dict(), dict(PIVOTS=2), dict(PIVOTS=8), dict(SEARCH_BLOCK=512),
            dict(BLOCK=1024, num_warps=4)],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default="flat", choices=["flat", "peaked"])
    args = parser.parse_args(argv)
    n, vocab = 16384, 128256
    student, teacher = make_inputs(n, vocab, torch.bfloat16, args.teacher, "cuda")
    records = []
    for kind, variants in FORWARD_SWEEP.items():
        fn = getattr(akl_kernels, f"{kind}_loss")
        for variant in variants:
            chosen = launch.forward_launch
            with mock.patch.object(launch, "forward_launch",
                                   lambda *a, v=variant, f=chosen: {**f(*a), **v}):
                fn(student, teacher)  # compile this variant outside the timing
                ms = cuda_median_ms(lambda: fn(student, teacher))  # noqa: B023
            records.append(dict(kernel=f"{kind}_forward", launch=variant, ms=ms, n=n,
                                vocab=vocab, dtype="bfloat16", teacher=args.teacher))
            print(json.dumps(records[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "launch_sweep.json").write_text(
        json.dumps(dict(meta=device_meta("cuda"), records=records), indent=1))


if __name__ == "__main__":
    main()
