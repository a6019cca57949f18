"""`python -m convostore_cli` is the `convostore` command."""

import sys

from .main import main

sys.exit(main())
