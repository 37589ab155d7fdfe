from adaptwin.cli import main

raise SystemExit(main())
