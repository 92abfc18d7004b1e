from medgemma_cli.cli import main

main()
