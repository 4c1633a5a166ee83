from llamazip.main import main

raise SystemExit(main())
