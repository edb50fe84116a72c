"""Checks object-store locations before Beam touches them: bucket names, then one request per store.

Beam's S3 and GCS filesystems retry a refused connection, missing AWS
credentials and a failed Google credential lookup with exponential backoff
(S3: about 8 minutes, with a traceback per retry) before the launch checks see
the error. One plain request here, with short timeouts, turns each of those
into one line within seconds, and so is a bucket that does not exist. Access
denied is left to the launch checks that say more (a key may read objects
without listing them).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, S3Options

from pipeline.errors import ExportConfigError

# Seconds one probe may wait to connect and then for its answer: a store that is up answers in well under.
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0
# https://cloud.google.com/storage/docs/buckets#naming: lowercase letters, digits, '-', '_' and '.',
# starting and ending with a letter or digit; 3-63 characters, or up to 222 with dots, 63 per part.
_GCS_BUCKET = re.compile(r"[a-z0-9][-_.a-z0-9]*[a-z0-9]")
_GCS_NAMING = "https://cloud.google.com/storage/docs/buckets#naming"


def bucket_of(uri: str) -> str:
    """The bucket of an object-store URI (`gs://b/x` -> `b`)."""
    return uri.split("://", 1)[1].split("/", 1)[0]


# botocore's own check of a bucket name (its handlers.VALID_BUCKET, legacy names included): any other
# name is refused by the client before a request, as a ParamValidationError.
_S3_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")


def check_s3_bucket_name(named: str, uri: str) -> None:
    """Refuses an s3:// URI whose bucket name boto3 refuses before any request.

    `s3://minio:9000/bucket/...` (an endpoint written into the path), a space or an
    empty name (`s3:///x`) otherwise end the launch in botocore's traceback.

    Args:
        named: the flag (or argument) as the error names it: "--input", "OUTPUT_DIR".
        uri: its value.

    Raises:
        ExportConfigError: naming the bucket, and where an endpoint goes.
    """
    bucket = bucket_of(uri)
    if _S3_BUCKET.fullmatch(bucket):
        return
    hint = (
        " An endpoint (host:port) goes in --s3_endpoint_url (or AWS_ENDPOINT_URL), not in the path: "
        "s3://BUCKET/KEY."
        if ":" in bucket
        else " Write it as s3://BUCKET/KEY."
    )
    raise ExportConfigError(
        f"{named} {uri!r}: {bucket!r} is not an S3 bucket name (letters, digits, '.', '-' and '_', "
        f"1 to 255 of them).{hint}"
    )


def check_gcs_bucket_name(flag: str, uri: str) -> None:
    """Refuses a gs:// URI whose bucket name Cloud Storage would never accept.

    Beam only warns about such a name in --temp_location / --staging_location and
    then tries to create a default bucket over the network (minutes offline, then a
    traceback); as --output the first write fails on the workers.

    Raises:
        ExportConfigError: naming the bucket and the rules.
    """
    bucket = bucket_of(uri)
    parts = bucket.split(".")
    problem = None
    if not _GCS_BUCKET.fullmatch(bucket):
        problem = (
            "only lowercase letters, digits, '-', '_' and '.' are allowed, and it must start and "
            "end with a letter or digit"
        )
    elif not 3 <= len(bucket) <= (222 if len(parts) > 1 else 63):
        problem = "it must be 3 to 63 characters long (up to 222 with dots)"
    elif any(not part or len(part) > 63 for part in parts):
        problem = "each part between dots must be 1 to 63 characters long"
    elif bucket.startswith("goog") or "google" in bucket:
        problem = "it may not start with 'goog' or contain 'google'"
    else:
        try:
            ipaddress.IPv4Address(bucket)
            problem = "it may not be an IP address"
        except ValueError:
            pass
    if problem:
        raise ExportConfigError(
            f"--{flag} {uri!r}: {bucket!r} is not a valid Cloud Storage bucket name ({problem}; "
            f"{_GCS_NAMING}). Use your bucket's name, e.g. gs://my-bucket/..."
        )


def check_stores_answer(options: PipelineOptions, locations: Mapping[str, str | None]) -> None:
    """Refuses, in seconds, object-store locations whose store cannot be reached or has no credentials.

    Args:
        options: the run's options (the --s3_* flags, --gcp_oauth_scopes).
        locations: flag name -> its value; local paths and None are passed over.

    One `list_objects_v2` per S3 bucket, through the client settings the --s3_*
    flags give Beam, with no retry; one Google credential lookup for gs://.

    Raises:
        ExportConfigError: saying which flag's store failed and how to fix it.
    """
    s3: dict[str, str] = {}
    gcs: list[str] = []
    for flag, uri in locations.items():
        if uri and uri.startswith("s3://"):
            s3.setdefault(bucket_of(uri), f"--{flag} {uri!r}")
        elif uri and uri.startswith("gs://"):
            gcs.append(f"--{flag} {uri!r}")
    if s3:
        _probe_s3(options.view_as(S3Options), s3)
    if gcs:
        _check_google_credentials(options.view_as(GoogleCloudOptions), gcs[0])


def check_s3_locations(options: PipelineOptions, locations: Mapping[str, str]) -> None:
    """`check_stores_answer` for the tools that run no pipeline (analyze, vocabulary, inspect).

    Args:
        options: the --s3_* settings (`pipeline.object_storage` makes them from the AWS_* variables).
        locations: each s3:// argument as the error names it ("OUTPUT_DIR", "--out") -> its value.

    Raises:
        ExportConfigError: a bucket name boto3 refuses, or a store that cannot be reached or has no
            credentials: one line in seconds, where Beam's S3 filesystem retries for minutes.
    """
    buckets: dict[str, str] = {}
    for named, uri in locations.items():
        check_s3_bucket_name(named, uri)
        buckets.setdefault(bucket_of(uri), f"{named} {uri!r}")
    if buckets:
        _probe_s3(options.view_as(S3Options), buckets)


def _probe_s3(s3: S3Options, buckets: dict[str, str]) -> None:
    """`buckets`: bucket -> the first flag naming it, as the error line says it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    client = boto3.session.Session().client(
        "s3",
        region_name=s3.s3_region_name,
        api_version=s3.s3_api_version,
        use_ssl=not s3.s3_disable_ssl,
        verify=s3.s3_verify,
        endpoint_url=s3.s3_endpoint_url,
        aws_access_key_id=s3.s3_access_key_id,
        aws_secret_access_key=s3.s3_secret_access_key,
        aws_session_token=s3.s3_session_token,
        config=Config(
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    endpoint = s3.s3_endpoint_url or "AWS S3"
    for bucket, named in buckets.items():
        try:
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except (NoCredentialsError, PartialCredentialsError) as error:
            raise ExportConfigError(
                f"{named}: no usable AWS credentials ({error}). Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --s3_access_key_id and "
                "--s3_secret_access_key."
            ) from None
        except (ConnectionError, HTTPClientError) as error:  # Refused, unknown host, TLS; no answer in time.
            raise ExportConfigError(
                f"{named}: cannot reach {endpoint} ({error}). Check --s3_endpoint_url "
                "(or AWS_ENDPOINT_URL) and that the server is up and reachable from this machine."
            ) from None
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
                # Else an --input "matches no files", and an --output fails only once the model is loaded.
                raise ExportConfigError(
                    f"{named}: the bucket {bucket!r} does not exist at {endpoint}. Check the bucket name "
                    "(and --s3_endpoint_url, or AWS_ENDPOINT_URL), or create the bucket."
                ) from None
            # Access denied (a key may read objects without listing them): the launch checks say more.


def _check_google_credentials(cloud: GoogleCloudOptions, named: str) -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default(scopes=cloud.gcp_oauth_scopes)
    except DefaultCredentialsError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportConfigError(
            f"{named} is on Cloud Storage, but no Google Cloud credentials were found ({first_line}). "
            "Run `gcloud auth application-default login`, or point GOOGLE_APPLICATION_CREDENTIALS "
            "at a service account key file."
        ) from None
