"""The data wing: the pickle contract both scripts read.

Owns: the split pickles' schema, file names, loading and shard merging (``dataset``), the allowlist
unpickler they load through (``safepickle``), streaming data bigger than memory (``streaming``),
whether two splits or a split and a model were preprocessed alike (``agreement``), and the reader of
preprocess's summaries that training uses (``summaries``).

May import: the shared base (``dss.*`` modules) only.
"""
