"""Network modules for kohya's `--network_module` extension point (`[network] module` in a run file).

They run inside kohya's process and environment, not dermkohya's: they import sd-scripts' own modules
(kohya puts its folder first on sys.path) and nothing from dermkohya beyond this package (and the
stdlib-only `dermkohya/__init__.py`). kohya imports them by name, so dermkohya's launcher puts the
source checkout, or in a user's project a copy of these files, on PYTHONPATH (`project.kohya_import_dir`).
"""
