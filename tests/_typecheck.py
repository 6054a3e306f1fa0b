"""The run-time type checker the test suite applies to every thinklens function.

``tests/conftest.py`` installs jaxtyping's import hook with :data:`checker` before
thinklens is imported, so every annotated function and dataclass of the package checks
its arguments' types and jaxtyping shapes (``Float[Tensor, "trace pos d_model"]``) on
each call during the tests. beartype is told to accept an ``int`` where ``float`` is
annotated (PEP 484's numeric tower), as Python's typing does.
"""

import contextlib

import jaxtyping
from beartype import BeartypeConf, beartype

checker = beartype(conf=BeartypeConf(is_pep484_tower=True))


@contextlib.contextmanager
def unchecked():
    """No run-time type checks inside the block: for a test of what a user without the
    checker sees (e.g. the ConfigError a bad shape gets from ``__post_init__``), or of a
    function called with a duck-typed stand-in."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
