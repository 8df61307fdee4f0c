"""``python -I -S -B GUEST_DIR CHANNEL_FD`` or ``... --fds-from CONTROL_FD``: run one program.

Run as a folder, this file's directory is ``sys.path[0]`` even under ``-I``; its parent goes
there instead, so that the folder imports as the package ``guest``.
"""

import importlib
import os
import sys

sys.path[0] = os.path.dirname(sys.path[0])
importlib.import_module("guest.runtime").main(sys.argv)
