from rolehost.cli import main

main()
