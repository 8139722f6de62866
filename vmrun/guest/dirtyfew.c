/* dirty.c writing only its three pages: fewer than a dirty ring's
 * reserve, so a ring never fills, whatever the host. */
#define MANY 0
#include "dirty.c"
