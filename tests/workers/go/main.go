// A Go HTTP server on the listening socket reuse-launch passes as fd 3, standard library only:
// net.FileListener(os.NewFile(3, ...)), and on SIGTERM a graceful http.Server.Shutdown (stop
// accepting, finish the requests in flight, exit 0). Answers `pid=.. slot=.. gen=..`.
//
//	reuse-launch -n 2 --ready auto -- tests/workers/go/go-fd3
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"
)

func main() {
	log.SetPrefix("go-fd3: ")
	log.SetFlags(0)
	f := os.NewFile(3, "listener")
	ln, err := net.FileListener(f)
	if err != nil {
		log.Fatalf("fd 3 is not a listening socket: %v", err)
	}
	f.Close() // FileListener made its own dup
	slot, gen := os.Getenv("REUSE_LAUNCH_SLOT"), os.Getenv("REUSE_LAUNCH_GENERATION")
	body := fmt.Sprintf("pid=%d slot=%s gen=%s\n", os.Getpid(), slot, gen)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprint(w, body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			log.Printf("shutdown: %v", err)
		}
		close(done)
	}()
	log.Printf("%s listens on fd 3 (%s)", runtime.Version(), ln.Addr())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatalf("serve: %v", err)
	}
	<-done
	log.Printf("pid %d stopped gracefully", os.Getpid())
}
