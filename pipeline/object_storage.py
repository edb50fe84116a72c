"""Beam FileSystems options from the standard AWS_* variables, for tools that run no pipeline."""

from __future__ import annotations

import os
from collections.abc import Mapping

# AWS's own variable -> the Beam flag `python -m pipeline.run` takes for it (S3Options).
AWS_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "--s3_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "--s3_secret_access_key",
    "AWS_SESSION_TOKEN": "--s3_session_token",
    "AWS_ENDPOINT_URL_S3": "--s3_endpoint_url",
    "AWS_ENDPOINT_URL": "--s3_endpoint_url",
    "AWS_REGION": "--s3_region_name",
    "AWS_DEFAULT_REGION": "--s3_region_name",
}


def s3_flags_from_environment(environment: dict[str, str] | None = None) -> list[str]:
    """The `--s3_*` flags the AWS_* variables of `environment` (default: this process's) stand for.

    The first variable set wins where two name one flag (AWS_ENDPOINT_URL_S3 over
    AWS_ENDPOINT_URL, AWS_REGION over AWS_DEFAULT_REGION), as in the AWS SDKs.
    """
    environment = dict(os.environ) if environment is None else environment
    flags: dict[str, str] = {}
    for variable, flag in AWS_VARIABLES.items():
        value = environment.get(variable)
        if value and flag not in flags:
            flags[flag] = value
    return [f"{flag}={value}" for flag, value in flags.items()]


def configure_for(locations: Mapping[str, str | None]) -> None:
    """Sets Beam's FileSystems options from the AWS_* variables when one of `locations` is on s3://,
    and asks each of their stores once.

    `python -m pipeline.run` gets these options from its `--s3_*` flags; the
    analysis tools run no pipeline, and without options Beam's S3 filesystem
    cannot make a client at all ("Must provide one of client or options").

    Args:
        locations: each path argument as an error names it ("OUTPUT_DIR", "--out") -> its value.

    Raises:
        ExportConfigError: a bucket name boto3 refuses, or an endpoint that does not answer or no
            credentials: one line within seconds, rather than Beam's minutes of silent retries.
    """
    on_s3 = {named: uri for named, uri in locations.items() if uri and uri.startswith("s3://")}
    if not on_s3:
        return
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.planning.stores import check_s3_locations

    options = PipelineOptions(s3_flags_from_environment())
    FileSystems.set_options(options)
    check_s3_locations(options, on_s3)
