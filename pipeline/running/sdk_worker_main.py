"""A local worker process (`--direct_running_mode=multi_processing`): Beam's SDK worker, without the teardown.

Beam starts each local worker as `python -m apache_beam.runners.worker.sdk_worker_main`;
`local_workers` starts this module in its place (its name keeps `sdk_worker_main`, as
process listings show it). It runs Beam's worker main as is; once that returns (the
launcher closed the worker's control stream: the run is over for it), the process
ends as `python -m pipeline.run` does (`pipeline.run._leave`): threads waited for,
exit functions run, then no interpreter teardown. Freeing TensorFlow, Keras and Beam
module by module took each worker 1.5-2 s of CPU, for which the launcher waited
at the end of every run. A worker whose main raises ends as before (a traceback, status 1).
"""

import logging
import sys

from apache_beam.runners.worker import sdk_worker_main


def main() -> None:
    # Beam's worker main logs its pipeline options at INFO, the filesystems' credentials the launcher
    # gives its workers (`local_workers.ignoring_ctrl_c`) included: a library user's INFO log showed them.
    logging.getLogger(sdk_worker_main.__name__).setLevel(logging.WARNING)
    sdk_worker_main.main(sys.argv)
    from pipeline.run import _leave

    _leave(0)


if __name__ == "__main__":
    main()
