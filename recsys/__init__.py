"""Cross-platform e-commerce recommendation on Ray.

Importing the package keeps any Ray cluster it starts on loopback: Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported, and with it set to 0
every Ray listener binds and advertises 127.0.0.1 (STACK_NOTES). An explicit value wins.
"""

import os as _os

_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
