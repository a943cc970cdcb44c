"""Installs the test suite's network guard (``tests/_netguard.py``) in Python processes the tests start.

``tests/conftest.py`` puts this folder on ``PYTHONPATH`` and names a log in ``MOIN_NETGUARD_LOG``; outside
the tests neither is set and this file does nothing.
"""

import importlib.util
import os
import sys

if os.environ.get("MOIN_NETGUARD_LOG"):
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_netguard.py")
    _spec = importlib.util.spec_from_file_location("_moin_netguard", _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["_moin_netguard"] = _module
    _spec.loader.exec_module(_module)
    _module.install()
