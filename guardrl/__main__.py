from guardrl.console import console_main

console_main()
