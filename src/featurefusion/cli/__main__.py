import sys

from featurefusion.cli import main

sys.exit(main())
