"""Deprecated: atomic writes moved to :mod:`captioner.files` (this alias goes in the next release).

Importing it warns once and hands back :mod:`captioner.files` itself, so a patch through the old
name still reaches the code that writes.
"""

import sys
import warnings

from captioner import files

warnings.warn("captioner.data.atomic moved to captioner.files; import it from there (the old name goes in "
              "the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = files
