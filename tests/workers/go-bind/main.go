// An unmodified Go server: net/http binds ":"+PORT itself (http.Server.ListenAndServe; the Go
// runtime makes raw system calls, so no LD_PRELOAD reaches it), with the standard graceful
// stop on SIGTERM (Shutdown finishes what was accepted). Built with CGO_ENABLED=0: a static
// binary. Under reuse-launch its bind() gets the slot's socket (--intercept-bind).
package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "pid=%d slot=%s gen=%s\n", os.Getpid(), os.Getenv("REUSE_LAUNCH_SLOT"), os.Getenv("REUSE_LAUNCH_GENERATION"))
	})
	srv := &http.Server{Addr: ":" + os.Getenv("PORT")}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		<-stop
		srv.Shutdown(context.Background())
		close(done)
	}()
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, "go-bind:", err)
		os.Exit(1)
	}
	<-done
}
