"""The ``smskd`` command: parser and commands, quickstart, export, completion, schema docs."""
