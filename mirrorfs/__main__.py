from mirrorfs.cli import main

raise SystemExit(main())
