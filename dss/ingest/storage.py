"""Open an input or output by its URI: ``s3://bucket/prefix/`` through ``dss.ingest.s3`` (imported
here, and only for ``s3://`` URIs, so folder runs never load boto3) or a local folder through
``dss.ingest.sources``, which defines the interface both sides implement.

    source = open_source("s3://animal-classification-dss-works/data/")   # or open_source("./data")
    output = open_output("./output")
"""

from __future__ import annotations

import os

from dss.ingest import sources


def open_source(uri: str | os.PathLike, options: sources.SourceOptions | None = None, client=None) -> sources.Source:
    """A Source for ``s3://bucket/prefix/`` (probed with one request now) or a local folder.

    ``client`` injects a ready boto3 S3 client (tests register botocore event hooks on it);
    otherwise one is made from ``options`` with ``dss.ingest.s3.make_s3_client``. Raises SourceError when
    the input is unusable.
    """
    options = options or sources.SourceOptions()
    if sources.is_s3_uri(uri):
        from dss.ingest.s3 import S3Source

        return S3Source(str(uri), options, client=client)
    return sources.LocalSource(uri, options)


def open_output(uri: str | os.PathLike, options: sources.SourceOptions | None = None, client=None) -> sources.Output:
    """A LocalOutput for a folder, or an S3Output (staging in a temp folder) for ``s3://``.
    Only ``endpoint_url``, ``max_attempts``, the timeouts and the pool size of ``options`` apply."""
    if sources.is_s3_uri(uri):
        from dss.ingest.s3 import S3Output

        return S3Output(str(uri), options or sources.SourceOptions(), client=client)
    return sources.LocalOutput(uri)
