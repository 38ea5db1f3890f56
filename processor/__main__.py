from processor._entry import main

main()
