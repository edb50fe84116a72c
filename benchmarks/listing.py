"""Side-by-side benchmark of the launch listing: `reading.listing.list_input` against Beam's own match.

    python -m benchmarks.listing [--files 20000] [--repeats 3]

Makes `--files` small JSONL files in 100 directories, then times, in this one
run and alternately, Beam's `FileSystems.match` (what the launcher used before)
and `listing.list_input` (which also follows directory links and records each
file's modification time) on the pattern `DIR/**.jsonl`, and the readers'
check of one file (`listing.check_unchanged`, one `stat`) per file. Reports the
best of `--repeats` for each and the ratio.
"""

import argparse
import os
import tempfile
import time

from apache_beam.io.filesystems import FileSystems

from pipeline.reading import listing


def _best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="embexport-listing-") as root:
        for index in range(args.files):
            directory = os.path.join(root, f"d{index % 100:03d}")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"f{index}.jsonl"), "w") as handle:
                handle.write(f'{{"id": "{index}", "content": "x"}}\n')
        pattern = os.path.join(root, "**.jsonl")
        beam_files = FileSystems.match([pattern])[0].metadata_list
        ours, _ = listing.list_input(pattern)
        assert sorted(m.path for m in beam_files) == sorted(f.path for f in ours)
        beam = _best(lambda: FileSystems.match([pattern]), args.repeats)
        listed = _best(lambda: listing.list_input(pattern), args.repeats)
        checks = _best(lambda: [listing.check_unchanged(f) for f in ours], args.repeats)
    print(f"{args.files:,} files, best of {args.repeats}:")
    print(f"  Beam FileSystems.match      {beam:8.3f} s")
    print(f"  listing.list_input          {listed:8.3f} s   ({listed / beam:.2f}x Beam's)")
    print(f"  check_unchanged, each file  {checks:8.3f} s   ({checks / args.files * 1e6:.1f} us a file)")


if __name__ == "__main__":
    main()
