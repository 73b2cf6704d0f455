from keybroker.cli.main import main

main()
