"""Command line: `python -m pipeline.run [flags]` exports layer vectors to Parquet.

With no flags it exports the bundled model's default layers for the bundled
sample corpus.  `--help` lists our flags; Beam's own (--runner, --project,
--region, --temp_location, ...) pass through to the runner.
"""

import logging
import os
import signal
import sys

# Quiet TensorFlow's C++ start-up chatter unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, ExportConfigError

# RunInference warns once per batch that it cannot read memory use, and local worker
# processes that they have no semi-persistent directory; neither changes anything.
# Worker processes' warnings arrive wrapped in a "Worker: ..." message, hence `in`.
_NOISE = ("Resource module is not available", "No semi_persistent_directory found")


def _drop_noise(record):
    message = record.getMessage()
    return not any(noise in message for noise in _NOISE)


def _interrupted():
    # The staged files stay invisible to readers; the next run removes them.
    print(
        "interrupted: nothing was committed; rerun the same command to export again "
        "(it removes what this run left).",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from pipeline.cli import options_parser
        from pipeline.options import ExportOptions

        options_parser(ExportOptions, prog="python -m pipeline.run", description=__doc__).print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Beam logs every bundle and worker message at INFO; keep its warnings only.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_noise)
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        from pipeline.export import format_summary, run_export

        summary = run_export(argv)
    except ExportConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception:
        # Beam re-raises a KeyboardInterrupt from inside a transform as a RuntimeError.
        if not interrupted:
            raise
        return _interrupted()
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(format_summary(summary))
    if summary.exit_code:
        print(f"error: {summary.message}", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    status = main()
    if status == EXIT_INTERRUPTED:
        # Beam's runner threads are not daemons: a normal exit would wait for them to
        # finish the whole pipeline. Nothing needs them (the lock is a file lock the
        # kernel releases, the next run removes the staging area), so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
