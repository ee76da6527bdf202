from fedslim.cli import main

raise SystemExit(main())
