"""The ingest wing: everything only preprocess.py needs, from an S3 prefix or a folder to pickles.

Owns: the source/output interface and its local side (``sources``), the S3 side (``s3``), opening
either by URI (``storage``), the label and features CSVs (``labels``), which image becomes which row
(``planning``), ``--limit`` and shards (``sharding``), decoding into the split pickle (``building``,
``splitfile``), the run's plain records (``records``) and its summary, leakage checks and ``--strict``
(``reporting``), and publishing the outputs (``publishing``).

May import: the shared base and ``dss.data`` (the pickle contract it writes).
"""
