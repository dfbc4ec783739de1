import sys

from perception2d_ros.cli.main import main

sys.exit(main())
