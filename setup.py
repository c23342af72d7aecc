"""Packaging. Metadata lives in setup.cfg; this adds the twistd plugin module.

``twisted/plugins`` is deliberately not a package (no ``__init__.py``): Twisted
finds plugin modules in every ``twisted/plugins`` directory on ``sys.path``.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mailstack", "mailstack.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["mailstack_plugin.py"]},
)
