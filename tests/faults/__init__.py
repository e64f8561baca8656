"""The fault corpus (issue #13): every fault dermkohya promises to handle, with its expected outcome.

`python -m tests.faults --readme` rewrites the README's table from the registry; test_corpus.py runs
every case and fails when the README's table differs from what the registry generates.
"""
