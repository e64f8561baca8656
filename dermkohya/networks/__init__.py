"""Network modules for kohya's `--network_module` extension point (`[network] module` in a run file).

They run inside kohya's process and environment, not dermkohya's: they import sd-scripts' own modules
(kohya puts its folder first on sys.path) and nothing from dermkohya beyond this package. kohya imports
them by name, so dermkohya's launcher puts the project root on PYTHONPATH (see `kohya.kohya_env`).
"""
