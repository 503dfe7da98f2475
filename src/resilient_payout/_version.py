"""The installed distribution's version.

It comes from the git tag at build time (hatch-vcs, docs/releasing.md), so it is read back from
the package metadata rather than written in a file: an editable install reports the version it
was installed at.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("resilient-payout")
    """The installed distribution's version (PEP 440): ``1.2.0`` from the tag ``v1.2.0``, or
    ``1.2.1.dev3+g1a2b3c4`` for a build three commits past it."""
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"
