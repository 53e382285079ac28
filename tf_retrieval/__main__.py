from tf_retrieval.cli import main
import sys
sys.exit(main())
