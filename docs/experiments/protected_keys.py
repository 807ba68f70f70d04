"""Time and memory of the key-statistics solve as a sequential run protects more keys (issue 35's
1,000-edit run: SmolLM2's d_in = 1536, 5 keys an edit, 22 keys solved at once per edit).

    OMP_NUM_THREADS=2 python docs/experiments/protected_keys.py

Prints, at each count of protected keys, the seconds of one solve and the process's resident
memory. No model is loaded: C is a random SPD matrix of SmolLM2's size.
"""

import time

import torch

from rrome_cli.engine.update import KeyCovariance


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    torch.manual_seed(0)
    d = 1536
    a = torch.randn(4 * d, d)
    cov = KeyCovariance(a.T @ a / (4 * d), ridge=1e-6)
    protected = 0
    for count in (500, 1000, 2000, 3000, 4000, 5000):
        while protected < count:
            cov.protect(torch.randn(d), 3.0)
            protected += 1
        keys = torch.randn(22, d)
        start = time.perf_counter()
        cov.solve(keys)
        seconds = time.perf_counter() - start
        print(f"{count} keys: solve {seconds:.2f} s, resident {resident_mib():.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
