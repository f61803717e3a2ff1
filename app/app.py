"""ETHER Studio from a checkout: ``python app/app.py [--port 7860] [--model ...]``, the same as
``ether-diffusion studio``. The studio is ``ether_diffusion.studio.ui``, in the package."""

import sys

from ether_diffusion.studio.ui import main

if __name__ == "__main__":
    sys.exit(main())
