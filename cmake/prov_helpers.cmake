# prov_add_library(<name> <glob> [PUBLIC deps...] [PRIVATE deps...])
# Sources are the files matching <glob> (relative to the repo root, re-globbed
# at build time), so adding a file never needs a CMake edit. Include paths are repo-rooted ("storage/x.hpp").
function(prov_enable_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
  if(PROV_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

function(prov_add_library name pattern)
  cmake_parse_arguments(ARG "" "" "PUBLIC;PRIVATE" ${ARGN})
  file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/${pattern})
  if(srcs)
    add_library(${name} STATIC ${srcs})
    target_include_directories(${name} PUBLIC ${CMAKE_SOURCE_DIR})
    target_link_libraries(${name} PUBLIC ${ARG_PUBLIC} Threads::Threads PRIVATE ${ARG_PRIVATE})
    target_compile_features(${name} PUBLIC cxx_std_17)
    prov_enable_warnings(${name})
  else()
    add_library(${name} INTERFACE)
    target_include_directories(${name} INTERFACE ${CMAKE_SOURCE_DIR})
    target_link_libraries(${name} INTERFACE ${ARG_PUBLIC} ${ARG_PRIVATE} Threads::Threads)
  endif()
  add_library(prov::${name} ALIAS ${name})
endfunction()

# prov_tsan_hooks(<executable>): in the ThreadSanitizer build, link the CAF
# happens-before hooks (tests/tsan/caf_happens_before.cpp); else nothing.
function(prov_tsan_hooks target)
  if(TARGET prov_tsan_caf)
    target_link_libraries(${target} PRIVATE prov_tsan_caf)
  endif()
endfunction()

# prov_add_test(<name> SOURCES ... LIBS ... [LABELS ...] [TIMEOUT s])
# One doctest executable per test folder; registered as one ctest entry.
function(prov_add_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} doctest::doctest)
  target_include_directories(${name} PRIVATE ${CMAKE_SOURCE_DIR})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  prov_enable_warnings(${name})
  prov_tsan_hooks(${name})
  add_test(NAME ${name} COMMAND ${name})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "${ARG_LABELS}")
endfunction()

# prov_link_jemalloc(<target>): jemalloc instead of glibc malloc when
# libjemalloc-dev is installed (scripts/install-deps.sh installs it).
# Per-request allocations from several I/O and actor threads cost ~15% of the
# server's CPU with glibc's arenas (docs/performance.md).
# PROV_USE_JEMALLOC=OFF keeps glibc malloc (sanitizer builds: the sanitizer
# must own the allocator).
option(PROV_USE_JEMALLOC "Link the server with jemalloc when available" ON)
function(prov_link_jemalloc target)
  if(NOT PROV_USE_JEMALLOC)
    return()
  endif()
  find_library(JEMALLOC_LIBRARY NAMES jemalloc)
  if(JEMALLOC_LIBRARY)
    target_link_libraries(${target} PRIVATE ${JEMALLOC_LIBRARY})
  else()
    message(WARNING "jemalloc not found (libjemalloc-dev): ${target} uses glibc malloc")
  endif()
endfunction()
