from plait.runtime.cli import main

raise SystemExit(main())
