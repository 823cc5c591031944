"""Constants shared by the data-pipeline tests (conftest.py is not importable by name)."""
SEQ_LEN = 32
