"""The benchmarks. Each module is a command run from the repository root as a module:

    python -m bench.run_all --quick     # every benchmark, docs/performance.md's figures
    python -m bench.train --tiny        # one of them

`bench` is a package of the checkout, not of the installed `cogfun`: `python -m` puts the current
folder first on the import path, which is how the modules import one another (`bench.models`) with
no path edits. They use only public names of `cogfun` (fixtures from `cogfun.testing`) and of one
another, never the tests' helpers. A child process is started the same way (`-m bench.NAME`),
from the same folder.
"""
