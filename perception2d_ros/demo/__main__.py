"""``python -m perception2d_ros.demo``: what ``make demo`` runs."""
import sys

from perception2d_ros.demo.run import main

sys.exit(main())
