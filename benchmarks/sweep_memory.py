"""Peak memory of ever larger sweeps stays flat (states are generated in chunks).

    python benchmarks/sweep_memory.py 4 32 256 > docs/perf_memory.md

Each size runs in a fresh interpreter so its peak RSS is its own.
"""
import subprocess
import sys

CHILD = r"""
import resource, sys, time, kvmmu
n = int(sys.argv[1])
t = time.perf_counter()
r = kvmmu.sweep(reachable_only=False, maxphyaddrs=range(n), check_guard=False)
print(f"| {n} | {r.states:,} | {r.inits:,} | {time.perf_counter() - t:.1f} | "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |")
"""


def main(sizes):
    print("## Sweep memory\n")
    print("`kvmmu.sweep(reachable_only=False, maxphyaddrs=range(N), check_guard=False)`: every "
          "raw control-bit combination x smm x guest_mode x vendor x gbpages x N MAXPHYADDR "
          "values, five flavors, three hosts, four variants; one fresh interpreter per row "
          "(`python benchmarks/sweep_memory.py " + " ".join(sizes) + "`).\n")
    print("| N | states per cell | context inits | seconds | peak RSS (MiB) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, n], capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["4", "32"])
