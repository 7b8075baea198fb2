from guardrl.cli import main

main()
