import sys

from tf_retrieval.serving.server import main

sys.exit(main())
