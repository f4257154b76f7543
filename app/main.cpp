// provisiond: the product binary. Everything it does is in provisiond.cpp,
// shared with the test binary (tests/testd/), which adds test seams that
// must never ship.

#include "app/provisiond.hpp"

int main(int argc, char** argv) { return prov::app::run(argc, argv); }
