import sys

from bytemamba.cli import main

sys.exit(main())
